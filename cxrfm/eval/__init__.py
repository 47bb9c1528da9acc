"""Evaluation of an exported model: report NLG and clinical-efficacy metrics, VQA, grounding."""
