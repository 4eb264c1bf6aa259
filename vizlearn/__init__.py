"""vizlearn."""
