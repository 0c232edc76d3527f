"""Records: the prediction log and the outcome log, written in bulk off the request path, spilled to a
local file when the database is away and replayed when it is back; and the outcome intake
(RecordOutcome/RecordOutcomes), which stores outcomes against logged predictions."""
