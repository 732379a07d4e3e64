"""InstructEval (declare-lab) settings as data loaders, answer extraction, metrics and a code sandbox.

The lm-eval YAMLs under ``evals/tasks`` call into these modules through thin ``utils.py`` files.
"""
