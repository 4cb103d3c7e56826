"""The runtime: the plan applied to llama.cpp, the engine protocol, chat formatting in a sandbox."""
