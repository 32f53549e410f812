"""`cnnserve score`: batch scoring of a folder, IDX file, array or manifest against a service.

`inputs` reads what to score, `stream` sends it through `ClassifyStream` (bounded window,
retries), `outputs` writes and resumes the result file, `report` computes and draws the
accuracy and confusion matrix, and `command` ties them together for the CLI. Like the rest of
the client side, nothing here imports torch or `export`.
"""
