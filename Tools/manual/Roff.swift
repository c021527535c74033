// Writing man(7) pages: the escaping roff needs and the few macros used.
// Plain man(7) rather than mdoc(7): man-db, groff and mandoc all render it.
import Foundation

struct Roff {
    private(set) var lines: [String] = []

    /// Text as roff sees it: backslashes and hyphens escaped (an option's
    /// `--` must stay two ASCII minus signs when copied from the page), and
    /// `code` spans in bold.
    static func escape(_ text: String) -> String {
        var out = ""
        var inCode = false
        for character in text {
            switch character {
            case "\\": out += "\\e"
            case "-": out += "\\-"
            case "`":
                out += inCode ? "\\fR" : "\\fB"
                inCode.toggle()
            default: out.append(character)
            }
        }
        if inCode { out += "\\fR" }
        return out
    }

    /// A quoted argument of a macro line.
    static func quoted(_ text: String) -> String {
        "\"" + escape(text).replacingOccurrences(of: "\"", with: "\\(dq") + "\""
    }

    static func bold(_ text: String) -> String { "\\fB" + escape(text) + "\\fR" }
    static func italic(_ text: String) -> String { "\\fI" + escape(text) + "\\fR" }

    mutating func macro(_ name: String, _ arguments: String...) {
        lines.append(([".\(name)"] + arguments).joined(separator: " "))
    }

    mutating func comment(_ text: String) {
        lines.append(".\\\" " + text)
    }

    /// Lines already escaped; a line that would start with a control
    /// character is protected with `\&`.
    mutating func raw(_ text: String) {
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix(".") || line.hasPrefix("'") {
                lines.append("\\&" + line)
            } else {
                lines.append(String(line))
            }
        }
    }

    /// Prose as the argument parser holds it: paragraphs split by blank
    /// lines, each filled; a paragraph whose lines are all indented is an
    /// example, kept as it is; one whose lines start with "- " is a list.
    /// `indented`: the body of a tagged paragraph (an option), which must
    /// keep the option's indent: paragraphs there start with `.IP`, the
    /// first one with nothing.
    mutating func prose(_ text: String, indented: Bool = false) {
        var paragraph: [Substring] = []
        var first = true
        func flush() {
            defer { paragraph = []; first = false }
            guard !paragraph.isEmpty else { return }
            let start = indented ? "IP" : "PP"
            if paragraph.allSatisfy({ $0.hasPrefix("  ") || $0.hasPrefix("\t") }) {
                if indented {
                    macro("IP")
                } else {
                    macro("PP")
                    macro("RS", "4")
                }
                macro("nf")
                for line in paragraph { raw(Self.escape(String(line))) }
                macro("fi")
                if !indented { macro("RE") }
            } else if paragraph.allSatisfy({ $0.hasPrefix("- ") || $0.hasPrefix("* ") || $0.hasPrefix("  ") }),
                      paragraph.first.map({ $0.hasPrefix("- ") || $0.hasPrefix("* ") }) == true {
                var items: [String] = []
                for line in paragraph {
                    if line.hasPrefix("- ") || line.hasPrefix("* ") {
                        items.append(String(line.dropFirst(2)))
                    } else {
                        items[items.count - 1] += " " + line.trimmingCharacters(in: .whitespaces)
                    }
                }
                for item in items {
                    if indented {
                        macro("IP")
                        raw("\\(bu " + Self.escape(item))
                    } else {
                        macro("IP", "\\(bu", "2")
                        raw(Self.escape(item))
                    }
                }
            } else {
                if !(indented && first) { macro(start) }
                raw(Self.escape(paragraph.map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")))
            }
        }
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.trimmingCharacters(in: .whitespaces).isEmpty {
                flush()
            } else {
                paragraph.append(line)
            }
        }
        flush()
    }

    var text: String { lines.joined(separator: "\n") + "\n" }
}
