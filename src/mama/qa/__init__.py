"""Video question answering: the question record type and the dataset readers."""
