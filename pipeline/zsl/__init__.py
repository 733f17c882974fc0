"""Zero-shot learning: the methods and caption bridges (:mod:`.models`), calibrated stacking and seen-class
splits (:mod:`.calibration`), the standard metrics (:mod:`.metrics`), transductive scoring
(:mod:`.transductive`), the HTML evaluation report (:mod:`.html_report`)."""
