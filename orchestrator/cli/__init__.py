"""The ``orchestrator`` command: the argparse tree, one thin handler per command (parse, build
settings, call a service, render), one output module, and the logging set-up. Only this
package prints, and only its entry point configures logging.

May import every other package.
"""
