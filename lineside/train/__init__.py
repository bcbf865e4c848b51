"""lineside.train: few-shot transfer learning (torch lives here and in export only)."""
