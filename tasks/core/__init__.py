"""What every room shares: settings, records, errors, redaction, escaping, language, the terminal, the object store."""
