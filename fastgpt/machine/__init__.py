"""What this machine is: its CPU's features, and fair timing of alternatives on it."""
