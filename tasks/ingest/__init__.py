"""From a release URL to chunks: the source policy, fetching and extracting, parsing, chunking, the diff, the run's report."""
