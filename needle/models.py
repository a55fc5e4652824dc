"""Models built from needle.nn: the recurrent language model."""
from . import nn, ops

__all__ = ["LanguageModel"]

_SEQ_MODELS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class LanguageModel(nn.Module):
    """Embedding -> RNN, LSTM or GRU -> Linear, predicting the next word at every position.

    Args:
        embedding_size: width of the word vectors.
        output_size: vocabulary size.
        hidden_size, num_layers: of the recurrent model.
        seq_model: 'rnn', 'lstm' or 'gru'.
        seq_len: the BPTT window the model is trained with (kept for the training loops).
        device, dtype: where and how parameters are stored.
        dropout: dropout after the embedding and after the recurrent layers, in training only (default 0).
        tie_weights: the output layer reuses the embedding matrix (needs embedding_size == hidden_size).
    Shapes: x (seq_len, bs) of word ids, h the recurrent state or None ->
        (logits (seq_len * bs, output_size), h).
    """

    def __init__(self, embedding_size, output_size, hidden_size, num_layers=1, seq_model="rnn", seq_len=40,
                 device=None, dtype="float32", *, dropout=0.0, tie_weights=False):
        super().__init__()
        if seq_model not in _SEQ_MODELS:
            raise ValueError(f"LanguageModel: seq_model must be one of {sorted(_SEQ_MODELS)}, got {seq_model!r}")
        if tie_weights and embedding_size != hidden_size:
            raise ValueError(f"LanguageModel: tie_weights needs embedding_size == hidden_size, got "
                             f"{embedding_size} and {hidden_size}")
        self.embedding_size, self.output_size, self.hidden_size = embedding_size, output_size, hidden_size
        self.num_layers, self.seq_model, self.seq_len = num_layers, seq_model, seq_len
        self.tie_weights = tie_weights
        self.embedding = nn.Embedding(output_size, embedding_size, device=device, dtype=dtype)
        self.seq = _SEQ_MODELS[seq_model](embedding_size, hidden_size, num_layers, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, output_size, device=device, dtype=dtype)
        if tie_weights:
            self.linear.weight = None  # the output layer reads the embedding matrix instead

    def forward(self, x, h=None):
        seq_len, bs = x.shape
        out, h = self.seq(self.dropout(self.embedding(x)), h)
        out = self.dropout(out).reshape((seq_len * bs, self.hidden_size))
        if not self.tie_weights:
            return self.linear(out), h
        logits = ops.matmul(out, ops.transpose(self.embedding.weight))
        return logits + ops.broadcast_to(self.linear.bias, logits.shape), h
