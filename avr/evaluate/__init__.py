"""Stage three: a trained head scored on every (caption, video) pair of a split."""
