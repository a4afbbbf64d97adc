"""Shared infrastructure every stage uses: errors, files, run directories, models, chat
formatting, templates, the question sets, answer grading and the statistics."""
