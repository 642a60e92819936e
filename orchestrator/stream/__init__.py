"""Reading datasets: pinned versions, and (issue 4) streaming items on demand."""
