"""Stage 4 building blocks shared by the zoo: embeddings, numeric tokens, MLP, cross, attention, FM, head."""
