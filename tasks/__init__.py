"""Tasks: pure, testable stage functions (decode, features, shard I/O) plus thin Prefect task wrappers."""
