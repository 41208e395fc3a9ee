#!/usr/bin/env python3
"""Write man/perdition.8's option list and perdition.conf.sample from
perdition.OPTIONS, so that --help, the man page and the sample configuration
say the same thing.  Run it after changing the option table:

    python3 man/generate.py
"""

import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import perdition  # noqa: E402

BEGIN, END = ".\\\" BEGIN OPTIONS\n", ".\\\" END OPTIONS\n"
PROTOCOLS_BEGIN = ".\\\" BEGIN PROTOCOLS\n"
PROTOCOLS_END = ".\\\" END PROTOCOLS\n"
SYNOPSIS_BEGIN = ".\\\" BEGIN SYNOPSIS\n"
SYNOPSIS_END = ".\\\" END SYNOPSIS\n"


def roff(text):
    return text.replace("\\", "\\e").replace("-", "\\-")


def default_text(option):
    if option.default is None:
        return None
    return "off" if option.arg is None else '"%s"' % option.default


def man_options():
    lines = []
    for option in perdition.OPTIONS:
        names = ", ".join(
            ["\\fB\\-%s\\fR" % option.short] * bool(option.short)
            + ["\\fB\\-\\-%s\\fR" % roff(n)
               for n in (option.long,) + option.aliases])
        lines.append(".TP\n%s%s\n" % (names, " \\fI%s\\fR" % roff(option.arg)
                                       if option.arg else ""))
        lines.append(roff(option.help) + "\n")
        default = default_text(option)
        if default is not None:
            lines.append(".br\n(default %s)\n" % roff(default))
    return "".join(lines)


def man_synopsis():
    """NAME and SYNOPSIS: what perdition is and every program name, from
    the registry."""
    programs = ["perdition"] + ["perdition." + program
                                for entry in perdition.PROTOCOLS.values()
                                for program in entry.programs]
    return "".join(
        [".SH NAME\nperdition \\- %s\n.SH SYNOPSIS\n"
         % roff(perdition.what_perdition_is())] +
        ["\\fB%s\\fR [\\fIoptions\\fR]\n.br\n" % name for name in programs] +
        ["\\fBpython3 perdition.py\\fR [\\fIoptions\\fR]\n"])


def man_protocols():
    """Each protocol of the registry: its -P names, ports, program names,
    the commands it takes before login and the capabilities it manages."""
    lines = []
    for cls in perdition.protocol_classes():
        names = [e for e in perdition.PROTOCOLS.values()
                 if e.protocol_class is cls]
        lines.append(".TP\n%s\n" % ", ".join("\\fB%s\\fR" % e.name
                                              for e in names))
        lines.append(roff(
            "Listening and outgoing ports: %s.  Invoked as %s.  Commands "
            "before login: %s.  The capabilities perdition adds and removes "
            "itself, as the connection's state says: %s.\n" % (
                ", ".join("%s %d%s" % (e.name, e.port, " (SSL from the "
                                       "start: ssl_all)" if e.ssl else "")
                          for e in names),
                perdition.or_list(("perdition." + program
                                   for e in names for program in e.programs)),
                ", ".join(cls.commands), ", ".join(cls.managed_capabilities))))
    return "".join(lines)


def sample_config():
    lines = ["# perdition.conf -- sample configuration, made from perdition's",
             "# option table by man/generate.py.  Each line is <key> <value>;",
             "# a key is a short or long option without dashes, a flag takes",
             "# no value.  '#' starts a comment.  See perdition(8).", ""]
    for option in perdition.OPTIONS:
        if option.long in perdition.NOT_IN_CONFIG_FILE:
            continue
        lines.extend(textwrap.wrap(option.help, 76, initial_indent="# ",
                                   subsequent_indent="# "))
        if option.arg is None:
            lines.append("#%s" % option.long)
        elif not option.default:
            lines.append("#%s %s" % (option.long, option.arg))
        else:
            lines.append("#%s %s" % (option.long, option.default))
        lines.append("")
    return "\n".join(lines)


def main():
    page = os.path.join(ROOT, "man", "perdition.8")
    with open(page) as f:
        text = f.read()
    for begin, end, make in ((SYNOPSIS_BEGIN, SYNOPSIS_END, man_synopsis),
                             (BEGIN, END, man_options),
                             (PROTOCOLS_BEGIN, PROTOCOLS_END, man_protocols)):
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + begin + make() + end + tail
    with open(page, "w") as f:
        f.write(text)
    with open(os.path.join(ROOT, "perdition.conf.sample"), "w") as f:
        f.write(sample_config())


if __name__ == "__main__":
    main()
