"""Models: Keras builders, training and decoding for the four LSTM model families."""
