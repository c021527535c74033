import Testing
@testable import FerryWire

@Suite struct EndpointTests {
    @Test(arguments: [
        ("127.0.0.1:7070", Endpoint.tcp(host: "127.0.0.1", port: 7070)),
        ("[::1]:7070", .tcp(host: "::1", port: 7070)),
        ("[fe80::1%eth0]:22", .tcp(host: "fe80::1%eth0", port: 22)),
        ("seeder.example:7070", .tcp(host: "seeder.example", port: 7070)),
        ("localhost:0", .tcp(host: "localhost", port: 0)),
        (" 10.0.0.1:65535 ", .tcp(host: "10.0.0.1", port: 65535)),
        ("unix:/run/ferry.sock", .unix(path: "/run/ferry.sock")),
        ("unix:relative.sock", .unix(path: "relative.sock")),
    ])
    func parses(text: String, expected: Endpoint) throws {
        let e = try Endpoint(parsing: text)
        #expect(e == expected)
        // The description parses back to the same endpoint.
        #expect(try Endpoint(parsing: e.description) == e)
    }

    @Test(arguments: [
        ("", "empty"),
        ("127.0.0.1", "port is missing"),
        ("127.0.0.1:", "port is missing"),
        ("127.0.0.1:70000", "0 to 65535"),
        ("127.0.0.1:-1", "0 to 65535"),
        ("127.0.0.1:http", "0 to 65535"),
        (":7070", "host is missing"),
        ("::1:7070", "needs brackets"),
        ("[::1]", "port is missing"),
        ("[::1:7070", "no closing"),
        ("[nothex]:1", "not an IPv6 address"),
        ("bad host:1", "not a valid host name"),
        ("unix:", "path is empty"),
        ("/run/ferry.sock", "unix: prefix"),
        ("unix:/" + String(repeating: "x", count: 120), "limit is 107"),
    ])
    func rejects(text: String, reason: String) {
        do {
            _ = try Endpoint(parsing: text)
            Issue.record("\"\(text)\" was accepted")
        } catch {
            #expect(error.description.contains(reason), "\(error.description)")
            #expect(error.description.contains("invalid endpoint"))
            #expect(error.description.contains("examples:"))
        }
    }

    @Test func descriptions() {
        #expect(Endpoint.tcp(host: "::1", port: 1).description == "[::1]:1")
        #expect(Endpoint.tcp(host: "h", port: 2).description == "h:2")
        #expect(Endpoint.unix(path: "/a").description == "unix:/a")
    }
}
