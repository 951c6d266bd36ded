"""Evaluators: zero-shot retrieval recall@K and LVIS/COCO-style detection AP."""
