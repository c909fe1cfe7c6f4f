"""Scoring for the local arith task: psft-lite's own answer rule, so the harness and `psft-lite eval` agree."""

from psft_lite.inference.evaluate import answers_match, extract_answer, normalize


def process_results(doc, results):
    return {"acc": float(answers_match(extract_answer(results[0]), normalize(str(doc["answer"]))))}
