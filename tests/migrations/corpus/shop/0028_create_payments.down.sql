DROP TABLE payments;
DROP TYPE payment_status;
