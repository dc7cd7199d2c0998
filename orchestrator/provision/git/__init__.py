"""Git for the ComfyUI tree, the shared config repo and the custom nodes, through GitPython.

    urls        pure rules: safe URLs, branch names and commit ids; redaction; transient or not
    command     GitError/SshKeyError, the GitRunner seam, GitPython's ``Git`` bound to a runner
    worktree    reading a work tree with ``git.Repo`` (HEAD, branch, origin, shallow), partial clones
    ssh         the SSH key for ssh URLs (CUT_PK_1..3 / SSH_PRIVATE_KEY), written 0600 on first use
    client      GitClient: timeouts, retries, ssh environment, redacted errors, atomic clones

GitPython is the one way to read and change repositories: reads use its ref and config
readers (packed refs, symbolic refs, worktrees; reftable falls back to asking git); commands are
calls on its ``Git`` command object. Deadlines: that object's ``execute`` is routed through our
one command runner (:mod:`orchestrator.machine.runner`) rather than using GitPython's own
``kill_after_timeout`` machinery, whose value we still accept as the deadline. GitPython waits on
pipes (an ssh ControlPersist master or a hook's background helper that holds git's stdout keeps
it waiting past the kill), kills only the direct children it finds with ``ps``, and does not
make git die with us; the runner starts git in its own session, kills the whole tree at the
deadline, collects output through files and sets PR_SET_PDEATHSIG. Routing through one seam also
keeps the tests' fault injection: a test passes a runner that records calls or fails them.

GitPython runs ``git version`` when imported, so it is imported on first use
(:func:`~orchestrator.provision.git.command.import_gitpython`), never at import time.

Secrets: ``GIT_TERMINAL_PROMPT=0`` on every command, ``GIT_SSH_COMMAND`` only for ssh URLs, and
every URL in a message or log line goes through ``redact_url``.
"""
