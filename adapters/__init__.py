"""Built-in adapters, registered through the blockquant.adapters entry-point group."""
