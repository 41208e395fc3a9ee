"""--help, the man page and the sample configuration agree with the option
table, perdition.OPTIONS, which is the one place options are defined."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "man"))

import generate  # noqa: E402
import perdition  # noqa: E402

from helpers import run_perdition  # noqa: E402


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def test_man_page_and_sample_are_generated_from_the_table():
    page = read("man", "perdition.8")
    begin = page.index(generate.BEGIN) + len(generate.BEGIN)
    assert page[begin:page.index(generate.END)] == generate.man_options()
    assert read("perdition.conf.sample") == generate.sample_config()
    begin = page.index(generate.PROTOCOLS_BEGIN) + len(
        generate.PROTOCOLS_BEGIN)
    assert page[begin:page.index(generate.PROTOCOLS_END)] == \
        generate.man_protocols()


def test_man_page_names_every_protocol_of_the_registry():
    page = read("man", "perdition.8")
    for name, entry in perdition.PROTOCOLS.items():
        assert "\\fB%s\\fR" % name in page
        for program in entry.programs:
            assert "perdition.%s" % program in page
    for cls in perdition.protocol_classes():
        for word in cls.managed_capabilities:
            assert generate.roff(word) in page


def section(page, title):
    """The text of the man page's section *title*, up to the next one."""
    begin = page.index(".SH %s\n" % title) + len(".SH %s\n" % title)
    end = page.find("\n.SH ", begin)
    return page[begin:] if end < 0 else page[begin:end + 1]


def test_man_page_synopsis_is_generated_from_the_registry():
    """NAME and SYNOPSIS come from the registry, so a new protocol or
    program name cannot be left out of them."""
    page = read("man", "perdition.8")
    begin = page.index(generate.SYNOPSIS_BEGIN) + len(
        generate.SYNOPSIS_BEGIN)
    synopsis = page[begin:page.index(generate.SYNOPSIS_END)]
    assert synopsis == generate.man_synopsis()
    assert synopsis.startswith(".SH NAME\nperdition \\- POP3, IMAP4 and "
                               "ManageSieve proxy server\n.SH SYNOPSIS\n")
    for cls in perdition.protocol_classes():
        assert cls.title in synopsis.splitlines()[1]
    names = re.findall(r"^\\fB(.*?)\\fR \[\\fIoptions\\fR\]$", synopsis,
                       re.M)
    assert names == ["perdition"] + [
        "perdition." + program for entry in perdition.PROTOCOLS.values()
        for program in entry.programs] + ["python3 perdition.py"]
    assert "perdition.managesieve" in names


def test_help_names_every_protocol():
    result = run_perdition(["--help"])
    assert result.returncode == 0
    first = result.stdout.splitlines()[0]
    assert re.fullmatch(r"perdition \S+ -- POP3, IMAP4 and ManageSieve "
                        r"proxy server", first), first


def test_man_page_explains_local_authentication():
    """-a needs a PAM service, and pam_unix works only for root: the
    manual says where the service is and what to use instead."""
    text = " ".join(section(read("man", "perdition.8"),
                            "LOCAL AUTHENTICATION").split())
    assert "\\fI/etc/pam.d/perdition\\fR" in text
    assert "pam_unix can check the password of another user only as " \
        "root: run as \\fB\\-u nobody\\fR (the default), perdition may " \
        "use it only for the user it runs as." in text
    assert "\\fB\\-u root\\fR" in text


def test_help_is_the_usage_text():
    result = run_perdition(["--help"])
    assert result.returncode == 0
    # The defaults under SYSCONFDIR follow the environment of the run.
    sysconfdir = perdition_env_sysconfdir(result)
    assert result.stdout == perdition.usage("perdition").replace(
        perdition.SYSCONFDIR + "/", sysconfdir + "/")


def perdition_env_sysconfdir(result):
    match = re.search(r'--ssl_cert_file FILENAME:\n.*\(default "(.*)/'
                      r'perdition.crt.pem"\)', result.stdout)
    return match.group(1)


@pytest.mark.parametrize("option", perdition.OPTIONS, ids=lambda o: o.long)
def test_option_documented_everywhere(option):
    text = perdition.usage("perdition")
    entry = re.search(r"^%s\b.*:\n(.*)$" % re.escape(option.names), text,
                      re.M)
    assert entry, option.names
    if option.default is not None:
        expected = "off" if option.arg is None else '"%s"' % option.default
        assert entry.group(1).endswith("(default %s)" % expected)
    page = read("man", "perdition.8")
    assert "\\fB\\-\\-%s\\fR" % option.long.replace("-", "\\-") in page
    if option.long not in perdition.NOT_IN_CONFIG_FILE:
        assert re.search(r"^#%s\b" % option.long,
                         read("perdition.conf.sample"), re.M)


def test_sample_configuration_values_are_valid(tmp_path):
    """Every value the sample shows, uncommented, is accepted."""
    lines = [line[1:] for line in read("perdition.conf.sample").splitlines()
             if re.match(r"#[a-z_]+( |$)", line)]
    keys = {line.split()[0] for line in lines}
    assert keys == {o.long for o in perdition.OPTIONS
                    if o.long not in perdition.NOT_IN_CONFIG_FILE}
    skip = {"inetd_mode", "config_file"}
    usable = []
    for line in lines:
        option = perdition.OPTIONS_BY_NAME[line.split()[0]]
        if option.long not in skip and (option.arg is None
                                        or option.default):
            usable.append(line)
    conf = tmp_path / "all.conf"
    conf.write_text("\n".join(usable) + "\n")
    config = perdition.Config(["perdition", "-f", str(conf)])
    assert config.config_file == str(conf)
    assert config.ok_line == "You are so in"
    assert config.debug is True
