// `keygen` and `secret`: the same subcommands in every executable.
import ArgumentParser
import Foundation
import FerryMigration

public struct KeygenCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "keygen",
        abstract: "Write a new key pair: FILE (private, mode 0600) and FILE.pub (one line to give to peers).",
        discussion: """
            Give the .pub line to the other side, which lists it in its --authorized file. \
            Refuses to overwrite an existing file (or a symbolic link) at FILE or FILE.pub unless --force, \
            which replaces them without following links.
            """)

    @Option(name: .shortAndLong, help: ArgumentHelp("Private key file to write.", valueName: "FILE"))
    public var output: String

    @Option(name: .long, help: "A comment stored after the public key, such as user@host.")
    public var comment: String?

    @Flag(name: .long, help: "Replace an existing key file.")
    public var force = false

    public init() {}

    public func run() throws {
        // `save` refuses an existing file or link at FILE or FILE.pub
        // without --force, and with it replaces them without following links.
        let pair = try KeyPair.generate()
        try pair.save(privatePath: output, publicPath: output + ".pub",
                      comment: comment ?? "\(NSUserName())@\(ProcessInfo.processInfo.hostName)",
                      replace: force)
        print(pair.publicKey.text)
    }
}

public struct SecretCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "secret",
        abstract: "Print a new random pre-shared secret (save it, mode 0600, on both sides for --secret-file).")

    public init() {}

    public func run() throws {
        print(try PreSharedSecret.generate().text)
    }
}
