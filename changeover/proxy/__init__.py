"""The data plane: the embedded proxy and the HAProxy driver, behind one interface (`base.DataPlane`)."""
