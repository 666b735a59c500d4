"""charrnn: character-level RNN language models on The Time Machine, after d2l chapter 8."""
__version__ = "0.1.0"
