ALTER TYPE payment_status ADD VALUE 'refunded';
