"""What is shown: the tags, the dashboard layout and wording, the TensorBoard writer and the fan-out to writers."""
