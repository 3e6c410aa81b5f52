"""One bank's side of fedmoe: its data, DP training and encrypted updates."""
