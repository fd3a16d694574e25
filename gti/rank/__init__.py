"""Ranking: the trie of valid SIDs, constrained beam search, Recall/NDCG."""
