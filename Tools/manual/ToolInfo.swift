// The part of swift-argument-parser's `--experimental-dump-help` JSON
// (`ToolInfoV0`, serialization version 0) that a manual page needs. The
// library's own `ArgumentParserToolInfo` module is not a product of the
// package, so the fields are read here; unknown fields are ignored and
// unknown kinds kept as text, so a newer parser still produces a page.

struct ToolInfo: Decodable {
    var serializationVersion: Int
    var command: CommandInfo
}

struct CommandInfo: Decodable {
    var superCommands: [String]?
    var shouldDisplay: Bool?
    var commandName: String
    var aliases: [String]?
    var abstract: String?
    var discussion: String?
    var defaultSubcommand: String?
    var subcommands: [CommandInfo]?
    var arguments: [ArgumentInfo]?

    /// The words that invoke this command: `leecher pull`.
    var invocation: [String] { (superCommands ?? []) + [commandName] }
    /// Its page's name: `leecher-pull`, as `man leecher pull` looks for it.
    var pageName: String { invocation.joined(separator: "-") }
    var isShown: Bool { (shouldDisplay ?? true) && commandName != "help" }
    var shownSubcommands: [CommandInfo] { (subcommands ?? []).filter(\.isShown) }
    var shownArguments: [ArgumentInfo] { (arguments ?? []).filter(\.shouldDisplay) }
}

struct ArgumentInfo: Decodable {
    struct Name: Decodable {
        /// `long`, `short` or `longWithSingleDash`.
        var kind: String
        var name: String

        var spelled: String {
            switch kind {
            case "short", "longWithSingleDash": return "-" + name
            default: return "--" + name
            }
        }
    }

    /// `positional`, `option` or `flag`.
    var kind: String
    var shouldDisplay: Bool
    var sectionTitle: String?
    var isOptional: Bool
    var isRepeating: Bool
    var names: [Name]?
    var preferredName: Name?
    var valueName: String?
    var defaultValue: String?
    var allValues: [String]?
    var allValueDescriptions: [String: String]?
    var abstract: String?
    var discussion: String?

    var isPositional: Bool { kind == "positional" }
    var takesValue: Bool { kind != "flag" }
    var value: String { valueName ?? preferredName?.name ?? "value" }
}
