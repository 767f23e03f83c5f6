"""dist: ranks and their process group: who this process is, the rendezvous, the stage ring that
carries hidden states and tokens between ranks, timeouts, and failures that end the whole job.
May import: system, core."""
