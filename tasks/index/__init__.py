"""The Milvus index and its lifecycle: the schema and names, the store's verbs, builds, publishing, the writer slot, lineage."""
