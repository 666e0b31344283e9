from mpproxy.proxy.edge.acl import Acl


def test_deny_first_then_allow():
    acl = Acl(allow=['10.0.0.0/8', '2001:db8::/32'], deny=['10.1.0.0/16'])
    assert acl.permits('10.2.3.4')
    assert not acl.permits('10.1.2.3')
    assert not acl.permits('192.168.1.1')
    assert acl.permits('2001:db8::1')
    assert not acl.permits('2001:db9::1')


def test_empty_allow_means_everyone_but_the_denied():
    acl = Acl(deny=['127.0.0.2/32'])
    assert acl.permits('127.0.0.1') and not acl.permits('127.0.0.2')


def test_ipv4_mapped_addresses_match_ipv4_rules():
    acl = Acl(deny=['127.0.0.2/32'])
    assert not acl.permits('::ffff:127.0.0.2') and acl.permits('::ffff:127.0.0.1')


def test_garbage_is_refused():
    assert not Acl(allow=['0.0.0.0/0']).permits('not-an-ip')
