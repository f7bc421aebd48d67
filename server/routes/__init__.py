"""One router per concern: embed, search, items, health (+ metrics), page."""
