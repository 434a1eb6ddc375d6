"""Documents: loading, chunking, embedding, indexing and retrieval with citations."""
