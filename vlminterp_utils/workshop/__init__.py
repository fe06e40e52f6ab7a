"""The embedded model's workshop: training shapes-llava, its evaluation and model card, the judge's training,
the corpus generator. The chapters never import it; it may import them."""
