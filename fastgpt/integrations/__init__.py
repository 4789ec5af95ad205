"""fastgpt's attention inside other libraries' models, one module per library.

Nothing is imported here: each integration imports its library (an optional dependency) only when
it is imported itself, so `import fastgpt` never pulls in transformers.

    fastgpt.integrations.transformers   Hugging Face transformers 5.x (`pip install "fastgpt[hf]"`)
"""
