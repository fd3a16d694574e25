"""The paper's core: new SID tokens in the vocabulary, the strategies that initialise their rows, the overlay that trains only them."""
