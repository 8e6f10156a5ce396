//! Static routes (`[[route]]`) and the ordered list of hosts to try for a domain. Being written.
