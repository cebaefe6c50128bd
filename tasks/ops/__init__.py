"""Operating a deployment: retrieval evaluation against a gold set, the Prefect automations."""
