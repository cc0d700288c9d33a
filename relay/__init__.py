"""formrelay: a safe web-form-to-support email relay."""
