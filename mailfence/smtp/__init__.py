"""The SMTP side: the only package that speaks SMTP."""
