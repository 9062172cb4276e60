"""Text and data: the tokenizer and its BPE, the Shakespeare corpus, splits, and the windows cut from them."""
