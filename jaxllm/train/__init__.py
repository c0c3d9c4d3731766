"""The generic train step and loop, and the Objective record they consume. Names no objective."""
