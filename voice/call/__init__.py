"""One call, transport-agnostic: its session, its turns, its history."""
