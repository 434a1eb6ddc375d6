"""Parts of the Documents page: the per-file table and the indexing progress strip."""
