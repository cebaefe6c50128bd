-- The question queue's database, beside Prefect's (created by POSTGRES_DB).
CREATE DATABASE docsrag_queue OWNER docsrag;
