"""The question queue and the tables beside it: claiming with leases, waiting, repeats, feedback."""
