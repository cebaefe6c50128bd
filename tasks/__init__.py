"""The steps the flows call, a room per concern. A room imports only the rooms below it:

    core < embed < ingest < index < queue < answer < service < ops

(the import-graph test in tests/ holds the code to it). No Prefect flow is defined here."""
